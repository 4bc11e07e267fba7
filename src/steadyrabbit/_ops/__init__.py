"""Operations tools: what people run beside a worker, off the message path.

Dead letters (``dlq``), the HTTP relay (``relay``), the live view (``top``), the
``--processes`` worker pool (``processes``), ``doctor`` and the ``demo``. They use the
framework; the framework (connection supervisor, consumer, publisher, worker) never imports
them. This package's own import loads nothing: each tool is imported where it is used.
"""
