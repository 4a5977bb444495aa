"""Small helpers shared by the modules of daskml_scale (private: not part of the API)."""
