"""The Python kernel `make lab` registers (as ``python3`` in the course's venv): ipykernel's own,
except that the ``language_info`` it reports names no Python version.

JupyterLab writes the kernel's ``kernelspec`` and ``language_info`` into a notebook's metadata
when it connects, and marks the notebook *modified* if they differ from what the file holds.
``language_info`` carries the exact Python version (3.11.7, 3.12.4, ...), so a committed chapter
would show as modified on every machine whose Python differs from the author's, though the
learner changed nothing. The chapters store :data:`KERNELSPEC` and :data:`LANGUAGE_INFO`
(``tests/test_colab.py`` checks), and this kernel reports exactly those.

Run as ``python -m bnviz.kernel -f CONNECTION_FILE`` (what the kernelspec's argv says).
"""
from __future__ import annotations

__all__ = ["KERNELSPEC", "LANGUAGE_INFO", "kernel_json"]

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3"}


def kernel_json(python: str) -> dict:
    """The kernelspec file that starts this kernel with ``python``."""
    return {"argv": [python, "-m", "bnviz.kernel", "-f", "{connection_file}"],
            "display_name": KERNELSPEC["display_name"], "language": "python",
            "metadata": {"debugger": True}, "kernel_protocol_version": "5.5"}


def main() -> None:
    from ipykernel.ipkernel import IPythonKernel
    from ipykernel.kernelapp import IPKernelApp

    class CourseKernel(IPythonKernel):
        language_info = LANGUAGE_INFO

    IPKernelApp.launch_instance(kernel_class=CourseKernel)


if __name__ == "__main__":
    main()
