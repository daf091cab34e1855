"""Sphinx configuration of the course site (myst-nb + sphinx-book-theme, built offline).

Built by ``make site`` / ``python site/build.py build``: that script executes the notebooks
(with its execution cache), copies this folder and the executed notebooks into a staging folder,
and runs Sphinx there. Nothing is executed or downloaded by Sphinx itself
(``nb_execution_mode = "off"``); MathJax and plotly.js are served from ``_static``.
The ``bnviz_*`` values below are filled in by the build script through ``-D`` overrides.
"""
project = "bnviz: batch normalization, interactively"
author = "the bnviz course"
copyright = "the bnviz course authors (MIT licence)"

extensions = ["myst_nb"]
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "notebooks"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}

# ---- notebooks: executed beforehand by site/build.py (its own cache); Sphinx only renders them
nb_execution_mode = "off"
nb_ipywidgets_js = {}  # no widget JS from a CDN: widget outputs are replaced at staging
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "html_image"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]

# ---- offline: MathJax 3 from _static (copied from sphinx-mathjax-offline at staging)
mathjax_path = "mathjax/tex-chtml.js"

# ---- theme
html_theme = "sphinx_book_theme"
html_title = "bnviz: batch normalization"
html_favicon = "_static/favicon.svg"  # (else the browser asks for /favicon.ico and logs a 404)
html_static_path = ["_static"]
html_extra_path = ["notebooks"]  # the raw notebooks, for "Download notebook" (notebooks/NAME.ipynb)
html_css_files = ["bnviz-site.css"]
html_js_files = ["plotly.min.js"]  # before the outputs' inline Plotly.newPlot calls
html_last_updated_fmt = "%Y-%m-%d %H:%M UTC"
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,  # our own links (Download notebook / Colab / JupyterLab) sit on each page
    "use_fullscreen_button": True,
    "home_page_in_toc": True,
    "navigation_with_keys": False,
    "pygments_light_style": "default",
    "pygments_dark_style": "monokai",
}
html_context = {"default_mode": "light"}
