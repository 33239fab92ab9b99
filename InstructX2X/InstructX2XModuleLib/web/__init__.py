"""The browser panel (``instructx2x-web``): ``app`` is its command line, ``panel.WebPanel`` the
page put together from its parts (see ``panel``)."""

import os

# Before any VTK window exists, whichever of the panel's modules is imported first: render
# offscreen through EGL (Mesa llvmpipe on a server with no GPU), never through X, which a server
# does not have.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
