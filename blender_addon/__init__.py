"""Direct3D-S2 image-to-3D for Blender (extension entry point: registration only).

The add-on never imports torch: generation runs in a separate engine process
(``python -m engine worker``) that it talks to through ``engine_client``.
"""

from . import operators, preferences, properties, ui

_modules = (properties, preferences, operators, ui)


def register():
    for module in _modules:
        module.register()


def unregister():
    for module in reversed(_modules):
        module.unregister()
