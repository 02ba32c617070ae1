"""File formats: NIfTI reading, the class CSVs, class labels and the labels of dataset.json, atomic writes."""
