"""Scripts every bundle carries at its root, to run on the device without edgeft.

`bench_on_device.py` (integrity check, thread sweep, device facts, one JSON object) and `chat.py` (the
smallest app using the bundle) import only the standard library and the artifacts' runtimes (llama_cpp,
onnxruntime_genai), so they run from a bare `python3` with those installed. They are modules of this
package too: `edgeft.bench` imports the measurement core from `bench_on_device`, so edgeft, the bench/
scripts and the device share one definition of prefill and decode tok/s.
"""
