"""Other libraries' adapter formats: AdapterHub `adapters` folders, adapters (`mtl.interop.adapterhub`) and
AdapterFusion (`mtl.interop.adapterhub_fusion`)."""
