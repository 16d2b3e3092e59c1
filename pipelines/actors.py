"""The model actors' base: a SAM model built once per actor, on its device, encoding prepared rows;
and the per-actor memory cap. Imported by the actor classes only (torch at first use)."""

from typing import TYPE_CHECKING, Dict, Optional

import numpy as np

from tinysam.transforms import IMAGE_SIZE, normalize_and_pad

if TYPE_CHECKING:
    import torch


class SamActor:
    """Base of the Ray actors: builds the model once, on GPU when there is one, and encodes
    prepared rows. With `bf16` the encoder runs under bf16 autocast on CUDA (SAM-H: 3.4x); with
    `compile` it is compiled by Inductor at its first batch. Where code is compiled, smaller
    batches are padded to the largest seen, so one batch size is compiled per actor."""

    def __init__(
        self,
        model_type: str,
        checkpoint: Optional[str],
        device: Optional[str] = None,
        cpu_threads: Optional[int] = None,
        bf16: bool = True,
        memory_gb: Optional[float] = None,
        compile: bool = False,
    ) -> None:
        import torch

        from tinysam.build_sam import build_sam
        from tinysam.utils.malloc import keep_freed_memory

        keep_freed_memory()  # a dedicated process: reuse freed memory instead of faulting it in again
        if memory_gb:
            cap_memory(memory_gb)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cpu_threads:  # Ray pins worker processes to one thread unless told otherwise
            torch.set_num_threads(cpu_threads)
        self.sam = build_sam(model_type, checkpoint).to(self.device).eval()
        self.mean, self.std = self.sam.pixel_mean, self.sam.pixel_std
        self.autocast = bf16 and self.device.type == "cuda"
        if compile:
            self.sam.image_encoder = torch.compile(self.sam.image_encoder)
        # Compiled code (fused attention on CUDA, --compile) is specialised per batch size, and past
        # dynamo's recompile limit (8 graphs: 4 batch sizes) it falls back to slow eager code.
        # Batches are ragged (failed images, a block's last rows): pad each up to the largest seen.
        self.pad_batches = self.device.type == "cuda" or compile
        self.batch_rows = 0

    def encode(self, batch: Dict[str, np.ndarray], rows: np.ndarray) -> "torch.Tensor":
        """Image embeddings (len(rows), 256, 64, 64) of the prepared rows `rows`."""
        import torch

        # Normalise the resized image, then zero-pad: padding is zero after normalisation.
        x = torch.stack(
            [
                normalize_and_pad(
                    torch.from_numpy(np.array(batch["pixels"][i, :h, :w])).to(self.device).permute(2, 0, 1),
                    IMAGE_SIZE,
                    self.mean,
                    self.std,
                )
                for i, h, w in zip(rows, batch["input_h"][rows], batch["input_w"][rows])
            ]
        )
        n = len(x)
        if self.pad_batches and n < self.batch_rows:  # zero images: each row is encoded on its own
            x = torch.cat([x, x.new_zeros((self.batch_rows - n, *x.shape[1:]))])
        self.batch_rows = max(self.batch_rows, n)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.sam.image_encoder(x)[:n].float()


def cap_memory(gb: float) -> None:
    """Let this process allocate at most `gb` GiB beyond what it has mapped now (RLIMIT_AS): an
    image that needs more fails alone, with a MemoryError (numpy) or an allocation RuntimeError
    (torch), instead of the whole worker being killed by the system for memory."""
    import resource

    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    limit = mapped + int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
