"""Checkpoints as files: what a model name means and where its files are (hub), the original
microsoft/CvT `.pth` conversion (convert), and reading, checking and writing weights."""
