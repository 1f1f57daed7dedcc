"""Tests of ``siftguide/data/``: the DataModules of ``data/__init__.py`` one file each (Fashion-MNIST, image
folders), the device transform, the DataModule protocol (``protocol.py``)."""
