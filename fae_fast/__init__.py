"""fae_fast: a fast Filtering Autoencoder (FAE) for structural anomaly detection.

Importing this package needs only torch and numpy: Triton, the compiled extension, DALI and a GPU are all
optional and are loaded on first use (see :mod:`fae_fast._backend`).

Example:
    >>> import fae_fast
    >>> det = fae_fast.Detector()                      # doctest: +SKIP
    >>> det.fit("path/to/mvtec/bottle")                 # doctest: +SKIP
    >>> res = det.predict(images)                       # doctest: +SKIP
    >>> res.pred_score, res.anomaly_map, res.pred_mask  # doctest: +SKIP
"""
from ._version import __version__
from .config import CorruptionConfig, FAEConfig, MapConfig, ModelConfig, NoiseConfig, TrainConfig, preset

__all__ = ["__version__", "FAEConfig", "CorruptionConfig", "NoiseConfig", "ModelConfig", "MapConfig",
           "TrainConfig", "preset", "Detector", "Prediction"]


def __getattr__(name):  # lazy: the API pulls in models and data, which plain `import fae_fast` need not
    if name in ("Detector", "Prediction"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fae_fast' has no attribute {name!r}")
