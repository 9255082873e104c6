"""Reporting: the graph diff, the output check, agreement on images, mixture statistics, and their renderers."""
