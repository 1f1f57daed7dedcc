"""The data layer, one concept per file: Fashion-MNIST's files (:mod:`.formats`), folder scanning (:mod:`.scanning`),
datasets and unreadable files (:mod:`.datasets`), the DataModules (:mod:`.datamodules`), the generated variants
(:mod:`.synthetic`), the resumable training order (:mod:`.sampler`), the device transform (:mod:`.transform`) and
what siftguide needs of a DataModule (:mod:`.protocol`)."""
from .datamodules import FashionMNISTDataModule, ImageFolderDataModule
from .datasets import FolderImages, TensorImages, collate_skipping, warn_unreadable
from .formats import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist
from .protocol import take
from .sampler import ResumableSampler, train_order
from .scanning import scan_images
from .synthetic import (ClutteredFashionMNISTDataModule, DecoyFashionMNISTDataModule, TintedFashionMNISTDataModule,
                        TranslatedFashionMNISTDataModule)
from .transform import DeviceTransform, MultiCropTransform, Views
