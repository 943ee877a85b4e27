"""④⑤ Imaging: renditions, pure rendering, and the cache of rendered bytes."""
