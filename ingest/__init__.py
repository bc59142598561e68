"""Turn whole-slide images, DICOM series and image folders into WebDataset shards with a manifest."""
