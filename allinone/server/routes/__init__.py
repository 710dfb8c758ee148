"""The service's routes, one module per area; each builds an APIRouter over the shared `Server`."""
