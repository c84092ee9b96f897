"""Files in and out, one module a job.

- :mod:`fss.io.folders`: support and query folder layouts, class names.
- :mod:`fss.io.images`: bounded decoding (:func:`~fss.io.images.decode_image`), EXIF orientation, 8-bit RGB.
- :mod:`fss.io.masks`: the one mask parser and the one shot check (:func:`~fss.io.masks.check_shot`).
- :mod:`fss.io.tensors`: images and masks as the model's input tensors.
- :mod:`fss.io.outputs`: atomic writes, folder locks and their journal, label PNGs, overlays.
- :mod:`fss.io.video`: video files read frame by frame and written (PyAV, ``fss[video]``).
"""
