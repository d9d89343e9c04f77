"""Per-scene generation settings and per-session job state."""

import bpy
from bpy.props import (
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

UP_AXIS_ITEMS = [
    ("Z", "+Z", "The model's up direction points along +Z (Blender's up)"),
    ("Y", "+Y", "The model's up direction points along +Y"),
    ("X", "+X", "The model's up direction points along +X"),
    ("-Z", "-Z", "The model's up direction points along -Z (upside down)"),
    ("-Y", "-Y", "The model's up direction points along -Y"),
    ("-X", "-X", "The model's up direction points along -X"),
]


class D3D_PG_settings(bpy.types.PropertyGroup):
    """What to generate and how to bring it into the scene (saved with the .blend file)."""

    image_source: EnumProperty(
        name="Image Source",
        items=[
            ("FILE", "File", "Use an image file on disk"),
            ("DATABLOCK", "Blend File", "Use an image already loaded in this .blend file"),
        ],
        default="FILE",
    )
    image_path: StringProperty(
        name="Image",
        description="Reference image (PNG/JPEG/WebP; transparent background works best)",
        subtype="FILE_PATH",
        # No update callback on purpose: in the bpy 4.2 wheel a property with an update
        # callback crashes the interpreter at exit. The preview is keyed by file time instead.
    )
    image: PointerProperty(
        name="Image",
        type=bpy.types.Image,
        description="Reference image from this .blend file",
    )
    resolution: EnumProperty(
        name="Resolution",
        description="Sparse grid resolution: 1024 has finer detail, 512 is faster and needs less GPU memory",
        items=[("512", "512", "Faster, less GPU memory"), ("1024", "1024", "Finer detail")],
        default="1024",
    )
    seed: IntProperty(name="Seed", description="Random seed; the same seed and image give the same shape",
                      default=0, min=0)
    dense_steps: IntProperty(name="Coarse Steps", default=50, min=1, max=200,
                             description="Sampler steps of the coarse (dense) stage")
    dense_guidance: FloatProperty(name="Coarse Guidance", default=7.0, min=0.0, max=20.0,
                                  description="How strongly the coarse stage follows the image")
    sparse_512_steps: IntProperty(name="Detail 512 Steps", default=30, min=1, max=200)
    sparse_512_guidance: FloatProperty(name="Detail 512 Guidance", default=7.0, min=0.0, max=20.0)
    sparse_1024_steps: IntProperty(name="Detail 1024 Steps", default=15, min=1, max=200)
    sparse_1024_guidance: FloatProperty(name="Detail 1024 Guidance", default=7.0, min=0.0, max=20.0)
    remove_interior: BoolProperty(
        name="Remove Interior",
        description="Delete the hidden inner shell that the surface extraction leaves behind",
        default=True,
    )
    use_target_faces: BoolProperty(name="Limit Faces", default=True,
                                   description="Simplify the result to a face budget in the engine")
    target_faces: IntProperty(name="Target Faces", default=100000, min=100, max=10000000,
                              description="Number of triangles the engine simplifies the mesh to")
    placement: EnumProperty(
        name="Placement",
        items=[
            ("CURSOR", "3D Cursor", "Stand the result on the 3D cursor, scaled to the given height"),
            ("FIT_SELECTED", "Fit Selected",
             "Scale the result to fit inside the selected object's bounding box and stand it on its bottom"),
        ],
        default="CURSOR",
    )
    height: FloatProperty(name="Height", description="Size of the result along its up axis",
                          default=2.0, min=1e-4, soft_max=100.0, subtype="DISTANCE", unit="LENGTH")
    up_axis: EnumProperty(name="Up Axis", items=UP_AXIS_ITEMS, default="Z",
                          description="Scene axis that the model's up direction is turned to")
    smooth_shading: BoolProperty(name="Smooth Shading", default=True)
    remesh: EnumProperty(
        name="Remesh",
        items=[
            ("NONE", "None", "Keep the generated triangles"),
            ("VOXEL", "Voxel", "Blender's voxel remesh: even triangles, closes holes"),
            ("QUADRIFLOW", "Quad (QuadriFlow)", "Quad remesh with a target face count"),
        ],
        default="NONE",
    )
    voxel_size: FloatProperty(name="Voxel Size", default=0.02, min=1e-4, soft_max=1.0,
                              subtype="DISTANCE", unit="LENGTH",
                              description="Voxel size of the voxel remesh, in scene units")
    quad_faces: IntProperty(name="Quad Faces", default=5000, min=100, max=200000,
                            description="Target number of quads for QuadriFlow")

    def engine_settings(self) -> dict:
        """The settings object sent to the engine (keys of GenerationSettings)."""
        return {
            "resolution": int(self.resolution),
            "seed": int(self.seed),
            "dense_steps": int(self.dense_steps),
            "dense_guidance": float(self.dense_guidance),
            "sparse_512_steps": int(self.sparse_512_steps),
            "sparse_512_guidance": float(self.sparse_512_guidance),
            "sparse_1024_steps": int(self.sparse_1024_steps),
            "sparse_1024_guidance": float(self.sparse_1024_guidance),
            "remove_interior": bool(self.remove_interior),
            "target_faces": int(self.target_faces) if self.use_target_faces else None,
        }

    def import_options(self) -> dict:
        return {
            "placement": self.placement,
            "height": float(self.height),
            "up_axis": self.up_axis,
            "smooth_shading": bool(self.smooth_shading),
            "remesh": self.remesh,
            "voxel_size": float(self.voxel_size),
            "quad_faces": int(self.quad_faces),
            # The engine simplifies to the budget; Blender decimates further if it overshot.
            "max_faces": int(self.target_faces) if self.use_target_faces else None,
        }


class D3D_PG_job_state(bpy.types.PropertyGroup):
    """State of the running job, shown by the panel (never saved, never undone)."""

    running: BoolProperty(default=False)
    progress: FloatProperty(default=0.0, min=0.0, max=1.0, subtype="FACTOR")
    status: StringProperty(default="")
    last_error: StringProperty(default="")
    engine_report: StringProperty(default="")
    last_object: StringProperty(default="")


classes = (D3D_PG_settings, D3D_PG_job_state)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.d3d_settings = PointerProperty(type=D3D_PG_settings)
    bpy.types.WindowManager.d3d_job = PointerProperty(type=D3D_PG_job_state)


def unregister():
    del bpy.types.WindowManager.d3d_job
    del bpy.types.Scene.d3d_settings
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
