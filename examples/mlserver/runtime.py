"""An MLServer custom runtime serving a codedsmooth checkpoint (plain model, no RCI): probabilities over the
classes for an FP32 input of the checkpoint's shape. It imports only ``codedsmooth.models`` (and torch)."""

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from codedsmooth.models import load_checkpoint


class CodedSmoothRuntime(MLModel):
    async def load(self) -> bool:
        self.checkpoint = load_checkpoint(self.settings.parameters.uri)
        self.net = self.checkpoint.model.eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        with torch.no_grad():
            probs = torch.softmax(self.net(torch.from_numpy(x)), 1).numpy()
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("probabilities", probs)])
