"""Data: image folders as datasets (``folders``), hole masks (``masks``), facial landmarks
(``landmarks``), component boxes (``boxes``) and image files (``images``)."""
