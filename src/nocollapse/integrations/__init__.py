"""Bridges to other training frameworks; each module needs its own optional extra and is not
imported by the package (``import nocollapse`` never needs them).

- :mod:`nocollapse.integrations.lightning`: :class:`CollapseMonitorCallback` for a
  LightningModule (``pip install 'nocollapse[lightning]'``).
"""
