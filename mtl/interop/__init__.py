"""Other libraries' adapter formats: `mtl.interop.adapterhub` reads and writes AdapterHub `adapters` folders."""
