"""Default settings of `mole serve` (no imports: the CLI's help reads them at start-up)."""

MAX_BATCH = 8  # requests per engine batch
MAX_WAIT_MS = 10.0  # how long the first request of a batch waits for others
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_IMAGE_PIXELS = 16_000_000  # width x height of one image, checked before it is decoded
MAX_IMAGES = 8  # images per request
MAX_BODY_BYTES = 32 * 1024 * 1024  # request body (base64 images included)
MAX_TOKENS = 1024  # the largest max_tokens a request may ask for
SHUTDOWN_GRACE_S = 120  # on SIGTERM, how long in-flight requests may take to finish
