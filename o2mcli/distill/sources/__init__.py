"""Where training inputs x_t come from: real images (``images``); the DKDM buffer plugs in beside it."""

from o2mcli.distill.sources.base import Batch, DataSource
from o2mcli.distill.sources.images import ImageSource

__all__ = ["Batch", "DataSource", "ImageSource"]
