"""Slicer-side DeepMRI library: MRML <-> SimpleITK, task logic, background jobs and dependencies.

Importable without Qt (it runs on slicer-core); the module widgets and the Python console call it.
"""
