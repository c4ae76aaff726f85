"""metaensemble: learning the parameters of one network from many, on Ray and MLflow."""

__version__ = "0.1.0"
