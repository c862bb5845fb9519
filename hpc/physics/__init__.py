"""Scanner geometry, sinogram layouts, projectors, reconstruction and physical factors."""
