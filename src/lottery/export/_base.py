"""What every part of the export shares: the export kinds, the file format and its error."""

from __future__ import annotations

from lottery.errors import LotteryError

EXPORT_KINDS = ("dense", "blocks", "csr", "semi")
FORMAT = "lottery.export"
FORMAT_VERSION = 2  # 2: ops of any traced network (residual ``relu`` flag, ``batchnorm``, ``avgpool2d``,
# ``normalize``) and the data set's ``preprocessing``; version 1 descriptions still load
RTOL = 1e-4  # the check's tolerance, relative to max(1, max |reference output|)


class ExportError(LotteryError):
    """A model cannot be exported, or the exported network does not compute what the masked one does."""
