"""Training recipes for the shipped models (needs the 'train' extra: torchio, nilearn, scikit-learn).

Synthetic images from label maps (synth.py, labels.py) and the segmentation recipe (segment.py).
"""
