"""Face data: detection, alignment, datasets and the file formats of the field."""
