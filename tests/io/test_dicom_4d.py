"""4D DICOM series: time points ordered by header fields, t and z never mixed up, a partial last volume dropped
and reported (``medfusion convert`` exit status 3, ``EXIT_INCOMPLETE``), gaps named; low-precision IPP accepted."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from io_helpers import convert_command, ct_small_series

from medfusion.exit_codes import EXIT_INCOMPLETE, EXIT_SOME_FAILED
from medfusion.io.convert import convert_tree
from medfusion.io.dicom import DicomSeriesError, discover_series, read_series

N_T, N_Z, SIZE, STEP = 3, 4, 8, 2.5
ORIGIN = (-10.0, 20.0, 5.0)


def expected(t: int, z: int) -> np.ndarray:
    """Voxel values ``[i, j]`` of slice z at time t: distinct per (t, z) and per in-plane voxel."""
    i, j = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    return (1000 * t + 100 * z + i + SIZE * j).astype(np.float32)


def write_4d(
    folder,
    *,
    key: str = "TemporalPositionIdentifier",
    n_t: int = N_T,
    drop: tuple[tuple[int, int], ...] = (),
    seed: int | None = 0,
    jitter: float = 0.0,
    series_uid: str | None = None,
):
    """``n_t`` time points x ``N_Z`` axial slices of 8x8 CT, time told apart only by ``key``.

    ``drop`` lists ``(t, z)`` slices not written; file names and InstanceNumbers are shuffled by ``seed``;
    ``jitter`` adds +-jitter mm to z of alternate time points (low-precision IPP). Returns the folder.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study, frame_uid = generate_uid(), generate_uid()
    slots = [(t, z) for t in range(n_t) for z in range(N_Z) if (t, z) not in drop]
    names = np.arange(len(slots)) if seed is None else np.random.default_rng(seed).permutation(len(slots))
    for number, (t, z) in zip(names, slots):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series_uid, study, frame_uid
        ds.Modality, ds.PatientID, ds.SeriesNumber, ds.SeriesDescription = "CT", "P4D", 7, "perfusion"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(number) + 1
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z_mm = ORIGIN[2] + z * STEP + (jitter if t % 2 else -jitter)
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], round(z_mm, 4)]
        ds.PixelSpacing = [0.8, 0.7]
        ds.SliceThickness = STEP
        # a clock that runs through the acquisition: slices interleaved within each 2 s time point
        clock = 36000.0 + 2.0 * t + 0.3 * ((2 * z) % N_Z + z // 2)
        if key == "TemporalPositionIdentifier":
            ds.TemporalPositionIdentifier = t + 1
        elif key == "AcquisitionNumber":
            ds.AcquisitionNumber = t + 1
        elif key == "TriggerTime":
            ds.TriggerTime = 100.0 * t
        elif key == "ContentTime":
            ds.ContentTime = f"{int(clock // 3600):02d}{int(clock % 3600 // 60):02d}{clock % 60:09.6f}"
        else:
            raise ValueError(key)
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        stored = expected(t, z) + 1024  # DICOM rows x columns = array[i, j].T
        ds.PixelData = np.ascontiguousarray(stored.T).astype(np.int16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pydicom.dcmwrite(folder / f"IM{number:04d}", ds, enforce_file_format=True)
    return folder


def check_values(array: np.ndarray, n_t: int) -> None:
    assert array.shape == (SIZE, SIZE, N_Z, n_t)
    for t in range(n_t):
        for z in range(N_Z):
            np.testing.assert_array_equal(array[:, :, z, t], expected(t, z))


@pytest.mark.parametrize("key", ["TemporalPositionIdentifier", "TriggerTime", "ContentTime"])
def test_4d_series_ordered_by_time_then_position(tmp_path, key):
    volume = read_series(write_4d(tmp_path / "s", key=key))
    check_values(volume.array, N_T)
    assert volume.meta["time_key"] == key and volume.meta["incomplete"] is None
    # seconds between time points: TriggerTime 100 ms apart, ContentTime 2 s apart, no clock for the index
    step = {"TemporalPositionIdentifier": None, "TriggerTime": 0.1, "ContentTime": 2.0}[key]
    assert volume.meta["time_step"] == (None if step is None else pytest.approx(step))
    # the 3D affine of one time point: z axis = slice step along +S, origin at the first slice
    single = read_series(write_4d(tmp_path / "one", key=key, n_t=1))
    np.testing.assert_allclose(volume.affine, single.affine)
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), [0.7, 0.8, STEP])
    assert volume.affine[2, 3] == pytest.approx(ORIGIN[2])


def test_shuffled_file_order_gives_the_same_volume(tmp_path):
    a = read_series(write_4d(tmp_path / "a", seed=1))
    b = read_series(write_4d(tmp_path / "b", seed=2))
    c = read_series(write_4d(tmp_path / "c", seed=None))
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.array, c.array)


def test_acquisition_number_splits_by_default_and_merges_on_flag(tmp_path):
    folder = write_4d(tmp_path / "s", key="AcquisitionNumber")
    parts = discover_series(folder).series
    # contrast phases: one part each
    assert len(parts) == N_T and "AcquisitionNumber" in parts[0].split_reason
    merged = discover_series(folder, merge_acquisitions=True).series
    assert len(merged) == 1
    volume = read_series(merged[0])
    check_values(volume.array, N_T)
    assert volume.meta["time_key"] == "AcquisitionNumber" and volume.meta["time_values"] == [1.0, 2.0, 3.0]


def test_declared_temporal_positions_are_not_split_by_acquisition_number(tmp_path):
    folder = write_4d(tmp_path / "s")
    for path in folder.iterdir():  # each time point also a new AcquisitionNumber (as Philips dynamics)
        ds = pydicom.dcmread(path)
        ds.AcquisitionNumber = 10 + int(ds.TemporalPositionIdentifier)
        ds.save_as(path)
    found = discover_series(folder).series
    assert len(found) == 1 and found[0].split_reason is None
    volume = read_series(found[0])
    check_values(volume.array, N_T)
    assert volume.meta["time_key"] == "TemporalPositionIdentifier"


def test_position_jitter_between_time_points_is_tolerated(tmp_path):
    volume = read_series(write_4d(tmp_path / "s", jitter=0.01))
    check_values(volume.array, N_T)


def test_partial_last_volume_is_dropped_and_reported(tmp_path):
    folder = write_4d(tmp_path / "s", drop=((2, 1), (2, 3)))
    with pytest.warns(UserWarning, match="incomplete: dropped last volume with 2 of 4 slices"):
        volume = read_series(folder)
    check_values(volume.array, N_T - 1)
    assert volume.meta["incomplete"] == "incomplete: dropped last volume with 2 of 4 slices"
    # two time points, the second partial: one complete 3D volume is left
    with pytest.warns(UserWarning, match="incomplete"):
        single = read_series(write_4d(tmp_path / "two", n_t=2, drop=((1, 0),)))
    assert single.array.shape == (SIZE, SIZE, N_Z)
    np.testing.assert_array_equal(single.array[:, :, 2], expected(0, 2))


def test_partial_earlier_volume_is_refused_naming_the_positions(tmp_path):
    folder = write_4d(tmp_path / "s", drop=((1, 2),))
    with pytest.raises(DicomSeriesError, match="time point 1") as info:
        read_series(folder)
    assert "3 of 4 slices" in str(info.value) and f"{ORIGIN[2] + 2 * STEP:.2f}" in str(info.value)


def test_repeated_positions_without_time_field_are_refused(tmp_path):
    folder = write_4d(tmp_path / "s", key="TriggerTime")
    for path in folder.iterdir():  # every time point at TriggerTime 0: nothing tells them apart
        ds = pydicom.dcmread(path)
        ds.TriggerTime = 0
        ds.save_as(path)
    with pytest.raises(DicomSeriesError, match="duplicate slice positions"):
        read_series(folder)


def test_3d_missing_slice_names_the_missing_positions(tmp_path):
    files = ct_small_series(tmp_path / "s", n=6, step=2.0)
    z0 = float(pydicom.dcmread(files[0]).ImagePositionPatient[2])
    files[2].unlink()
    files[3].unlink()
    with pytest.raises(DicomSeriesError, match="missing slice") as info:
        read_series(tmp_path / "s")
    assert f"2 missing at {z0 + 4:.2f}, {z0 + 6:.2f} mm" in str(info.value)


@pytest.mark.parametrize("step", [0.625, 3.0])
def test_low_precision_ipp_is_not_varying_spacing(tmp_path, step):
    """dcm2niix#216/#325: IPP rounded to 0.01 mm, or float noise (3.000016), is accepted."""
    files = ct_small_series(tmp_path / "s", n=8, step=step)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient[2] = round(z, 2) + (1.6e-5 * k if step == 3.0 else 0.0)
        ds.save_as(path)
    volume = read_series(files)
    assert volume.spacing[2] == pytest.approx(step, abs=0.01)


def test_convert_writes_4d_nifti_and_exit_3_for_incomplete(tmp_path, capsys):
    root = tmp_path / "in"
    write_4d(root / "complete")
    write_4d(root / "stopped", drop=((2, 0), (2, 1), (2, 3)))
    out = tmp_path / "out"
    assert convert_command(str(root), str(out), "--no-progress") == EXIT_INCOMPLETE == 3
    text = capsys.readouterr().out
    assert "incomplete: dropped last volume with 1 of 4 slices" in text and "exit status 3" in text
    niftis = sorted(out.rglob("*.nii.gz"))
    assert len(niftis) == 2
    shapes = sorted(nib.load(p).shape for p in niftis)
    assert shapes == [(SIZE, SIZE, N_Z, N_T - 1), (SIZE, SIZE, N_Z, N_T)]
    for path in niftis:
        img = nib.load(path)
        check_values(np.asanyarray(img.dataobj), img.shape[3])  # voxel [i, j, z, t]
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["time_key"] == "TemporalPositionIdentifier" and len(sidecar["spacing"]) == 3
        assert sidecar["spacing"] == pytest.approx([0.7, 0.8, STEP])
        if img.shape[3] == N_T - 1:
            assert sidecar["incomplete"].startswith("incomplete: dropped last volume")

    # resume: outputs are skipped, and the run still says "incomplete volumes"
    def stamps():  # every output but the run report, which a rerun brings up to date
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "convert_report.csv"}

    before = stamps()
    report = convert_tree(root, out, progress=False)
    assert len(report.skipped) == 2 and report.exit_code == EXIT_INCOMPLETE
    assert stamps() == before

    # failures take precedence over incomplete volumes
    broken = ct_small_series(root / "gap", n=4)
    broken[1].unlink()
    assert convert_command(str(root), str(out), "--no-progress") == EXIT_SOME_FAILED == 1


def test_convert_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        convert_command("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "3 every input done, but an incomplete acquisition was dropped in part" in text


def test_volume_spacing_of_a_4d_array_is_spatial():
    import numpy as np

    from medfusion.io.volume import Volume

    aff = np.diag([0.5, 0.7, 2.0, 1.0])
    aff[:3, 3] = [10.0, 20.0, 30.0]
    vol = Volume(np.zeros((4, 5, 6, 3), np.float32), aff)
    assert vol.spacing == (0.5, 0.7, 2.0)


def test_convert_writes_the_time_step_to_pixdim4(tmp_path):
    """dcm2niix convention: pixdim[4] = seconds between volumes, xyzt units mm / s (issue 2 leftover)."""
    out = tmp_path / "out"
    report = convert_tree(write_4d(tmp_path / "in" / "s", key="ContentTime"), out, progress=False)
    assert report.exit_code == 0
    (path,) = sorted(out.rglob("*.nii.gz"))
    img = nib.load(path)
    assert img.header.get_zooms()[3] == pytest.approx(2.0)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["time_step"] == pytest.approx(2.0)


def test_write_nifti_time_step_needs_a_4d_array(tmp_path):
    from medfusion.io.nifti import write_nifti

    with pytest.raises(ValueError, match="time_step needs a 4D array"):
        write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)), np.eye(4), time_step=1.0)
    with pytest.raises(ValueError, match="> 0 s"):
        write_nifti(tmp_path / "b.nii.gz", np.zeros((4, 4, 4, 2)), np.eye(4), time_step=0.0)
    path = write_nifti(tmp_path / "c.nii.gz", np.zeros((4, 4, 4, 2)), np.eye(4), time_step=0.5)
    assert nib.load(path).header.get_zooms()[3] == pytest.approx(0.5)
