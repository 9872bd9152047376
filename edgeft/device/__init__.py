"""The script every bundle carries at its root, to run on the device without edgeft.

`bench_on_device.py` (integrity check, thread sweep, device facts, one JSON object) imports only the standard
library and the artifacts' runtimes (llama_cpp, onnxruntime_genai), so it runs from a bare `python3` with
those installed. It is a module of this package too: `edgeft.bench` imports the measurement core from it, so
edgeft, the bench/ scripts and the device share one definition of prefill and decode tok/s. The example apps
a bundle carries are in examples/ (edgeft.runspec copies them).
"""
