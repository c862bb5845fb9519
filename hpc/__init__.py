"""hpc: distributed training for PET/CT sinogram repair and denoising."""
__version__ = "0.1.0"
