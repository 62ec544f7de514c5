"""The model runtime: what opens and runs a bundle's exported models, below every stage that does so.

`edgekd export` (parity and accuracy of each exported model), `edgekd build` (TensorRT engines) and `edgekd bench`
(latency, memory) all stand on this package; it imports none of them, nor PyTorch, the `onnx` package, the models
or the data code, so it installs and runs on a device with ONNX Runtime or TensorRT alone.

    runners   one runner interface and its timed loop; the ONNX Runtime and TensorRT runners; the RUNNERS registry
    evalset   a bundle's eval.npz: loading, normalisation, predictions and accuracy of any runner
    tensorrt  TensorRT's import, and whether an engine was built for this GPU and TensorRT
    manifest  a bundle's manifest.json, read and written

Heavy modules (onnxruntime, tensorrt, cuda-python) are imported inside the functions that need them.
"""
