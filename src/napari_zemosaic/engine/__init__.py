"""The mosaic engine: pure Python, never imports napari or Qt."""
