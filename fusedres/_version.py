# fusedres's version, in this one place: setup.py reads it (pyproject.toml declares it dynamic),
# `fusedres.__version__` is it, and the build info records it (wheels may add +cuNN).
__version__ = "0.1.0"
