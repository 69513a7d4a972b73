"""The Filtering Autoencoder as an anomalib 2.x model (``pip install fae_fast[anomalib]``).

Laid out like anomalib's own models (``models/image/<model>/``): the network in :mod:`.torch_model`, the
training loss in :mod:`.loss`, the anomaly-map step in :mod:`.anomaly_map`, the ``AnomalibModule`` in
:mod:`.lightning_model`.

Example:
    >>> from anomalib.data import Folder                                  # doctest: +SKIP
    >>> from anomalib.engine import Engine                                # doctest: +SKIP
    >>> from fae_fast.integrations.anomalib import Fae                    # doctest: +SKIP
    >>> engine = Engine(max_steps=2000)                                   # doctest: +SKIP
    >>> engine.fit(model=Fae(preset="tiny"), datamodule=Folder(...))      # doctest: +SKIP
"""
try:
    import anomalib  # noqa: F401
except ImportError as exc:  # the message names the fix; the cause (e.g. a torchvision for another torch) follows
    raise ImportError(f"fae_fast.integrations.anomalib needs anomalib 2.x: pip install 'fae_fast[anomalib]' "
                      f"(import anomalib failed: {exc})") from exc

from .lightning_model import Fae  # noqa: E402

__all__ = ["Fae"]
