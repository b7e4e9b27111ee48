"""vlora's import namespace: `vlora.engine`, `vlora.deployments`, `vlora.adapters`, `vlora.client`.

The packages live at the repository root (engine/, deployments/, ...). An installed vlora (wheel or
editable) has them under vlora/ through pyproject's package-dir. Imported from a source tree that
was not installed (e.g. the GPU bench machine), this package also searches the repository root,
so `vlora.engine` is engine/ there.
"""

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "engine")) and _os.path.isdir(_os.path.join(_root, "engine")):
    __path__.append(_root)
