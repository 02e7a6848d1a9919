"""Blinded reader studies of real vs generated radiographs and reports: create, serve (Gradio + SQLite), results, export.

Modules: designs (what readers answer), create (case selection, blinding, re-encoding, reader orders), folder (the study
folder's layout and private files), store (SQLite), app (the Gradio app), results (statistics, HTML), export (preference
pairs for DPO).
"""
