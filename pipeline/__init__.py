"""rnnlab: classic recurrent-network experiments as a tracked, cached, sweepable pipeline."""

import os

# No telemetry from anything we run, and quieter TensorFlow start-up logs. setdefault: the user's choice wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
