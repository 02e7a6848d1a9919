import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def pin_xdist_worker() -> None:
    """Under pytest-xdist, give worker k of n every n-th core (from k) before torch starts: recipes size their thread pools
    by this affinity and subprocesses inherit it, so the workers share the machine instead of each using every core."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker and count and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        share = cores[int(worker.removeprefix("gw")) % len(cores)::int(count)]
        os.sched_setaffinity(0, share)
        os.environ["OMP_NUM_THREADS"] = str(len(share))


pin_xdist_worker()


@pytest.fixture(scope="session", autouse=True)
def medfm_home(tmp_path_factory):
    """Built-in bases and phantoms go to a per-session folder, never the user's cache."""
    home = tmp_path_factory.mktemp("medfm-home")
    os.environ["MEDFM_HOME"] = str(home)
    return home


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", slope=None, intercept=None, window=None, with_pixels=True):
    """A minimal valid CR DICOM file with 16-bit unsigned pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test trains in a fresh process-wide accelerate state (mixed precision differs between tests)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def phantom_folders(tmp_path_factory):
    """phantom_folders(num_images): two 64-px phantom imagefolders of seeds 1 and 2, {"a"|"b": (folder, uint8 images, prompts)},
    written once per session and size."""
    from medfm.data.phantom import write_phantom_dataset
    from medfm.eval.images import load_image_folder

    made = {}

    def folders(num_images: int) -> dict:
        if num_images not in made:
            root = tmp_path_factory.mktemp(f"phantoms-{num_images}")
            made[num_images] = {name: (folder, *load_image_folder(folder, 64))
                                for name, folder in ((name, write_phantom_dataset(root / name, num_images, seed=seed, size=64))
                                                     for name, seed in (("a", 1), ("b", 2)))}
        return made[num_images]

    return folders


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory):
    """tiny_bases(family): a tiny diffusion pipeline folder written by plain `save_pretrained`, built once per session and family."""
    from medfm.models.families import DIFFUSION_FAMILIES

    root, built = tmp_path_factory.mktemp("tiny-bases"), {}

    def folder(name: str) -> str:
        if name not in built:
            built[name] = root / name
            DIFFUSION_FAMILIES[name].build_tiny().save_pretrained(built[name])
        return str(built[name])

    return folder
