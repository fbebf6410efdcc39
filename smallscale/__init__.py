"""smallscale: small-scale language-model pretraining research, end to end."""

__version__ = "0.1.0"
