"""stylepipe: find stable training configurations for fast neural style transfer."""

__version__ = "0.1.0"
