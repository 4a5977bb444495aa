"""Privacy options of :class:`~daskml_scale.training.federated.Federated`.

**DP-FedAvg** (``clip_norm``, ``noise_multiplier``): every site clips its round's update
(the change of all its weights) to an L2 norm of at most ``clip_norm``; the driver
averages the clipped updates with equal weight per site (so one site moves the mean by
at most ``clip_norm / n``) and adds Gaussian noise of standard deviation
``noise_multiplier * clip_norm / n`` to every coordinate, where ``n`` is the number of
sites in the round. The noise is drawn from fresh entropy, not from the fit's seed.

**Secure aggregation** (``secure_aggregation=True``): the driver learns the *sum* of the
sites' updates and never one site's update. A round has two steps on every sampled
site, each pinned to the worker that trained:

1. the site trains, keeps its update on its worker and answers an X25519 public key
   made for this round (with its row count and metric sums, which stay in the clear);
2. the driver hands every site the public keys of the sites that answered; each pair
   of sites derives a shared key (X25519, then HKDF-SHA256 bound to the fit, the round
   and the pair), expands it with SHAKE-256 into a mask of 64-bit words, and the site
   answers its update in fixed point (``FRACTION_BITS`` fractional bits) plus, for each
   peer, that pair's mask (added by the site whose name sorts first, subtracted by the
   other), modulo 2**64. The masks cancel in the sum; each answer alone is uniformly
   distributed.

A site that answered step 1 and drops out in step 2 is handled as in Bonawitz et al.'s
protocol without its secret sharing: the remaining sites reveal the sum of their masks
with the dropped ones, which the driver subtracts. A round with fewer than two sites
left is discarded (the weights stay as they were), because a sum of one is that site's
update.

What it does not protect against: a driver that forges public keys (it relays them;
nothing authenticates one site's key to another), a driver that keeps a late answer of
a dropped site *and* asks for the reveal (double masking would prevent that; not
built), sites that collude with the driver, and what the row counts and metric sums
say. DP noise is added by the driver, which is trusted to add it (central DP).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from daskml_scale._utils.lru import LRUCache
from daskml_scale.exceptions import ArgumentError, TrainingError

__all__ = [
    "FRACTION_BITS", "add_noise", "clip_update", "cryptography_x25519", "decode", "encode", "flatten", "hold_update", "masked_update", "noise_std",
    "pair_mask", "reveal_masks", "secure_sum", "unflatten", "unmasked_sum",
]

logger = logging.getLogger(__name__)

#: fractional bits of the fixed-point encoding of the masked updates
FRACTION_BITS = 24
#: what one site's encoded value may reach: a sum of 2**10 sites stays inside int64
_LIMIT = 2.0 ** (62 - 10 - FRACTION_BITS)

# on a site's worker, between the two steps of a round: (fit, site, round) -> what it holds
_HELD: LRUCache[tuple[str, str, int], "_Held"] = LRUCache(16)


@dataclass
class _Held:
    private: Any  # X25519PrivateKey
    vector: np.ndarray | None  # the update in float64 until it is answered masked


def cryptography_x25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import x25519
    except ImportError as exc:  # pragma: no cover - the federated extra installs it
        raise ArgumentError("Federated(secure_aggregation=True) needs the cryptography package: "
                            "pip install 'daskml_scale[federated]'") from exc
    return x25519


# ----------------------------------------------------------------- DP-FedAvg
def clip_update(update: Sequence[np.ndarray], clip_norm: float) -> tuple[list[np.ndarray], float, bool]:
    """``update`` scaled down to an L2 norm of at most ``clip_norm``: (clipped, norm before, clipped?)."""
    norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))
    if norm <= clip_norm or norm == 0.0:
        return [np.asarray(u, np.float64) for u in update], norm, False
    scale = clip_norm / norm
    return [np.asarray(u, np.float64) * scale for u in update], norm, True


def noise_std(noise_multiplier: float, clip_norm: float | None, sites: int) -> float:
    """The standard deviation of DP-FedAvg's noise on the mean of ``sites`` clipped updates."""
    if not noise_multiplier or clip_norm is None or sites < 1:
        return 0.0
    return float(noise_multiplier) * float(clip_norm) / sites


def add_noise(update: list[np.ndarray], std: float) -> list[np.ndarray]:
    """Gaussian noise of ``std`` on every coordinate, from fresh entropy."""
    if std <= 0:
        return update
    rng = np.random.default_rng()
    return [u + rng.normal(0.0, std, size=np.shape(u)) for u in update]


# ------------------------------------------------------- vectors and fixed point
def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One float64 vector of ``arrays``, in order."""
    if not arrays:
        return np.zeros(0, np.float64)
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def unflatten(vector: np.ndarray, like: Sequence[Any]) -> list[np.ndarray]:
    """``vector`` cut into arrays of the shapes of ``like`` (float64)."""
    out, at = [], 0
    for a in like:
        n = int(np.prod(np.shape(a), dtype=np.int64))
        out.append(np.asarray(vector[at: at + n], np.float64).reshape(np.shape(a)))
        at += n
    if at != len(vector):
        raise TrainingError(f"Expected a vector of {at} values. Received: {len(vector)}")
    return out


def encode(vector: np.ndarray) -> np.ndarray:
    """Fixed point in 64-bit words (two's complement), ``FRACTION_BITS`` fractional bits."""
    vector = np.asarray(vector, np.float64)
    if len(vector) and not np.all(np.isfinite(vector)):
        raise TrainingError("Secure aggregation: the site's update is not finite (NaN or inf); the site is left out")
    if len(vector) and float(np.max(np.abs(vector))) >= _LIMIT:
        raise TrainingError(
            f"Secure aggregation: an update value ({float(np.max(np.abs(vector))):.3g}) is beyond the fixed-point "
            f"range (|x| < {_LIMIT:.3g}); set clip_norm, or lower the learning rate")
    return np.rint(vector * 2.0 ** FRACTION_BITS).astype(np.int64).view(np.uint64)


def decode(words: np.ndarray) -> np.ndarray:
    """The float64 values of a sum of :func:`encode` d vectors (modulo 2**64)."""
    return np.asarray(words, np.uint64).view(np.int64).astype(np.float64) / 2.0 ** FRACTION_BITS


# ------------------------------------------------------------------- the masks
def pair_mask(private: Any, peer_public: bytes, context: bytes, n: int) -> np.ndarray:
    """The mask of ``n`` 64-bit words that a pair of sites shares: X25519, HKDF-SHA256
    bound to ``context`` (fit, round, the pair's names), SHAKE-256 to length."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    x25519 = cryptography_x25519()
    shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"daskml-scale-secagg/" + context).derive(shared)
    return np.frombuffer(hashlib.shake_256(key).digest(8 * n), dtype=np.uint64).copy() if n else np.zeros(0, np.uint64)


def _context(fit_id: str, round_: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return f"{fit_id}/{round_}/{len(lo)}:{lo}/{hi}".encode()


def _signed_masks(held: _Held, fit_id: str, site: str, round_: int, peers: Mapping[str, bytes],
                  n: int) -> np.ndarray:
    """The sum over ``peers`` of this site's signed pair masks (modulo 2**64)."""
    total = np.zeros(n, np.uint64)
    for peer, public in sorted(peers.items()):
        if peer == site:
            continue
        m = pair_mask(held.private, public, _context(fit_id, round_, site, peer), n)
        total = total + m if site < peer else total - m  # uint64 arithmetic wraps: modulo 2**64
    return total


def hold_update(fit_id: str, site: str, round_: int, vector: np.ndarray) -> bytes:
    """Step 1 on the site's worker: keep ``vector`` here, answer this round's public key."""
    from cryptography.hazmat.primitives import serialization

    private = cryptography_x25519().X25519PrivateKey.generate()
    _HELD.put((fit_id, site, int(round_)), _Held(private, np.asarray(vector, np.float64)))
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _held(fit_id: str, site: str, round_: int) -> _Held:
    held = _HELD.get((fit_id, site, int(round_)))
    if held is None:
        raise TrainingError(f"Secure aggregation: site {site!r} holds no update of round {round_} on this worker "
                            "(the worker restarted, or its cache was full)")
    return held


def masked_update(fit_id: str, site: str, round_: int, peers: Mapping[str, bytes]) -> np.ndarray:
    """Step 2 on the site's worker: the held update in fixed point plus its signed pair
    masks with every peer (``peers``: site -> public key, this site included or not)."""
    if len([p for p in peers if p != site]) < 1:
        raise TrainingError("Secure aggregation needs at least two sites in a round")
    held = _held(fit_id, site, round_)
    if held.vector is None:
        raise TrainingError(f"Secure aggregation: site {site!r} already answered round {round_}")
    words = encode(held.vector)
    held.vector = None  # answered once; only the key stays, for a reveal
    return words + _signed_masks(held, fit_id, site, round_, peers, len(words))


def reveal_masks(fit_id: str, site: str, round_: int, dropped: Mapping[str, bytes], n: int) -> np.ndarray:
    """After a peer dropped out: this site's signed masks with the ``dropped`` peers only,
    which the driver subtracts from the sum of the answers it has."""
    return _signed_masks(_held(fit_id, site, round_), fit_id, site, round_, dropped, n)


def unmasked_sum(answers: Sequence[np.ndarray], reveals: Sequence[np.ndarray] = ()) -> np.ndarray:
    """The float64 sum of the sites' updates: the answers' sum less the revealed masks."""
    total = np.zeros(len(answers[0]), np.uint64)
    for a in answers:
        total = total + np.asarray(a, np.uint64)
    for r in reveals:
        total = total - np.asarray(r, np.uint64)
    return decode(total)


# ------------------------------------------------------------------ the driver
def _collect(client: Any, futs: Mapping[str, Any], timeout: float, what: str, round_: int) -> dict[str, Any]:
    """The results of ``futs`` (site -> future) that finish within ``timeout``; the others are
    cancelled and named in a warning (their sites count as dropped out)."""
    from daskml_scale.training.driver import wait_done

    wait_done(list(futs.values()), timeout)
    out: dict[str, Any] = {}
    for site, f in futs.items():
        if f.status == "finished":
            out[site] = f.result(timeout=timeout)
            continue
        reason = f.exception(timeout=timeout) if f.status == "error" else "no answer in time"
        logger.warning("daskml_scale.fit: secure aggregation, round %d: site %r dropped out (%s): %s",
                       round_, site, what, reason)
        f.cancel()
    return out


def secure_sum(client: Any, fit_id: str, round_: int, answered: Mapping[str, Mapping[str, Any]],
               timeout: float) -> tuple[np.ndarray, list[str]] | None:
    """Steps 2 (and the reveal) of a secure round, from the driver: the sum of the held
    updates of the sites in ``answered`` (site -> its step-1 result with ``public_key`` and
    ``worker``) and the sites in that sum; ``None`` when fewer than two sites are left."""
    keys = {s: bytes(r["public_key"]) for s, r in answered.items()}
    if len(keys) < 2:
        logger.warning("daskml_scale.fit: secure aggregation, round %d: %d site(s) answered; a sum needs two, so "
                       "the round is discarded", round_, len(keys))
        return None

    def on_site(fn: Any, site: str, *args: Any) -> Any:
        return client.submit(fn, fit_id, site, round_, *args, pure=False, workers=[answered[site]["worker"]],
                             allow_other_workers=False, key=f"daskml-fed-{fn.__name__}-{fit_id}-{site}-{round_}")

    got = _collect(client, {s: on_site(masked_update, s, keys) for s in keys}, timeout, "masked update", round_)
    if len(got) < 2:
        logger.warning("daskml_scale.fit: secure aggregation, round %d: %d masked update(s) arrived; a sum needs "
                       "two, so the round is discarded", round_, len(got))
        return None
    dropped = {s: k for s, k in keys.items() if s not in got}
    reveals: list[np.ndarray] = []
    if dropped:
        n = len(next(iter(got.values())))
        rev = _collect(client, {s: on_site(reveal_masks, s, dropped, n) for s in got}, timeout, "reveal", round_)
        if len(rev) < len(got):
            logger.warning("daskml_scale.fit: secure aggregation, round %d: a site dropped out during the reveal; "
                           "the round is discarded", round_)
            return None
        reveals = list(rev.values())
    return unmasked_sum([got[s] for s in sorted(got)], reveals), sorted(got)
