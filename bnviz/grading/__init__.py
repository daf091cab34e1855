"""Grading for the otter-grader assignment in ``notebooks/assignments/batch_norm``.

Student code never runs where checking happens:

* ``worker.py`` runs in a sandbox (``sandbox.py``: bubblewrap, or Docker) and executes one
  submission's code cells, then calls the student's functions on test inputs and reports their
  outputs;
* ``checker.py`` (trusted, never imports student code) draws the inputs, computes the references
  with PyTorch, compares, and owns tolerances and points; ``rules.py`` scans the source for the
  assignment's forbidden APIs; ``grade.py`` drives a folder and writes the record;
* ``build.py`` runs ``otter assign`` (students keep ``grader.check`` in JupyterLab and Colab).

Command line: ``python -m bnviz.grading build|grade`` (``cli.py``).
"""

from .build import DEFAULT_DIST, build_assignment, default_source, read_question_points
from .grade import grade_folder
from .sandbox import Limits, SandboxUnavailable

__all__ = ["DEFAULT_DIST", "build_assignment", "default_source", "read_question_points", "grade_folder",
           "Limits", "SandboxUnavailable"]
