"""The panel and its widgets: the Geo-R1 dock, its engine and Fine-tune sections, the annotation dock
and its map tool, the settings dialog."""
