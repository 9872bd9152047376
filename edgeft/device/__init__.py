"""The script every bundle carries at its root, to run on the device without edgeft.

`bench_on_device.py` (integrity check, thread sweep, device facts, one JSON object) imports only the standard
library, the artifacts' runtimes (llama_cpp, onnxruntime_genai) and `bundle_manifest.py`, the bundle's schema
shipped beside it (manifest.json and SHA256SUMS, read and written by edgeft through the same module), so it
runs from a bare `python3` with those installed. `sync_on_device.py` is the device's side of copying a bundle. It is a module of this package too: `edgeft.bench` imports the measurement core from it, so
edgeft, the bench/ scripts and the device share one definition of prefill and decode tok/s. The example apps
a bundle carries are in examples/ (edgeft.runspec copies them).
"""
