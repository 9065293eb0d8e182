"""Evaluation (`medtune eval`, in `run`): reference metrics (`metrics`), question relevance (`relevance`),
multiple-choice exams (`exam`), teacher-forced answer loss (`loss`), the red-flag detector's precision
and recall (`safety_check`), and the report (`report`).

Importing this package or its modules is light (no torch, transformers or scikit-learn): each function
imports its heavy libraries when called.
"""
