"""eulerbake: a reproducible, content-addressed image build engine driven by doit."""

__version__ = "0.1.0"
