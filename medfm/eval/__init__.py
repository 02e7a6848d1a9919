"""Evaluation of generated radiographs and reports."""
