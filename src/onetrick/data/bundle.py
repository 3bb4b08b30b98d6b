"""What every data source returns: :class:`DataBundle`, and its one-line :class:`DataError`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Bad data input; its message is one line naming the problem (path, spec).

    A DataError raised inside a DataLoader worker comes back to the main process
    wrapped in a traceback ("Caught DataError in DataLoader worker ..."); the
    constructor reduces such a message to the original single line.
    """

    def __init__(self, message: str = "") -> None:
        message = str(message)
        if "\nOriginal Traceback" in message:
            lines = [line for line in message.strip().splitlines() if line.strip()]
            last = lines[-1] if lines else message
            marker = "DataError: "
            message = last[last.index(marker) + len(marker):] if marker in last else last
        super().__init__(message)


@dataclass
class DataBundle:
    """A data set ready for training: the augmented training set and test views."""

    name: str
    train: Dataset  # items: (float Tensor[C, H, W], int label), augmented per access
    num_classes: int
    in_channels: int
    image_size: int
    loader_workers: int  # recommended DataLoader num_workers
    test_factory: Callable[[int], Dataset] = field(default=None, repr=False)  # views -> test set

    def __post_init__(self) -> None:
        self._tests: dict[int, Dataset] = {}

    def test(self, views: int = 1) -> Dataset:
        """The test set. ``views=1``: items ``(Tensor[C, H, W], label)``;
        ``views=10``: items ``(Tensor[10, C, H, W], label)`` (4 corners + centre and their
        horizontal flips; for data sets without flips, translations: see each source)."""
        if views not in (1, 10):
            raise DataError(f"test views must be 1 or 10, not {views!r}")
        if views not in self._tests:
            self._tests[views] = self.test_factory(views)
        return self._tests[views]
