"""`atlas publish`: check a rendered site against a host's limits, then put it there.

Nothing is uploaded until the whole site passes the host's check (``hosts.problems``).
Git hosts (GitHub Pages, Hugging Face Spaces, GitLab Pages) get a commit on a branch,
pushed (``git.push_site``); object storage and Cloudflare Pages get the exact command of
their own maintained tool, which skips what is already uploaded when run again.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from atlas.errors import AtlasError
from atlas.publish.hosts import HOSTS, Host, problems, scan

PUBLISH_DIR = ".publish"


def site_of(path: Path) -> Path:
    """``DIR/site`` for an atlas directory, or ``path`` itself when it is a rendered site."""
    path = Path(path)
    for candidate in (path / "site", path):
        if (candidate / "atlas-site.json").is_file():
            return candidate
    raise AtlasError(f"{path} holds no rendered site (no site/atlas-site.json); run `atlas render {path}` first")


def host_of(name: str) -> Host:
    if name not in HOSTS:
        raise AtlasError(f"unknown host {name!r}; pick one of {', '.join(HOSTS)}")
    return HOSTS[name]


def check(path: Path, host_name: str) -> tuple[dict, list[str]]:
    """The site's figures and every limit of the host that it breaks."""
    host = host_of(host_name)
    stats = scan(site_of(path))
    return stats, problems(stats, host)


def sync_command(site: Path, host: Host, remote: str) -> str:
    """The command that uploads ``site`` to ``remote`` with the host's own tool (resumable: it skips
    files that are already there with the same size)."""
    src = shlex.quote(str(site))
    if host.name.startswith("cloudflare-pages"):
        project = remote or "PROJECT"
        return f"npx wrangler pages deploy {src} --project-name {shlex.quote(project)}"
    if remote.startswith("gs://"):
        return f"gcloud storage rsync --recursive --delete-unmatched-destination-objects {src} {shlex.quote(remote)}"
    if remote.startswith(("s3://", "r2://")) or not remote:
        target = "s3://" + remote.split("://", 1)[1] if "://" in remote else "s3://BUCKET/PREFIX"
        endpoint = " --endpoint-url https://ACCOUNT_ID.r2.cloudflarestorage.com" if remote.startswith("r2://") else ""
        return f"aws s3 sync {src} {shlex.quote(target)} --delete --size-only{endpoint}"
    raise AtlasError(f"--remote {remote!r}: give s3://BUCKET/PREFIX, r2://BUCKET/PREFIX or gs://BUCKET/PREFIX")


def publish(path: Path, host_name: str, remote: str = "", branch: str = "", progress: bool = True) -> dict:
    """Check the site at ``path`` against ``host_name``'s limits, then publish it (see the module doc)."""
    from atlas.publish.git import push_site

    host = host_of(host_name)
    site = site_of(path)
    stats = scan(site)
    broken = problems(stats, host)
    if broken:
        raise SiteTooBig(host, broken)
    if host.kind == "command":
        return {"host": host.name, "command": sync_command(site, host, remote), "stats": stats}
    if not remote:
        raise AtlasError(f"--to {host.name} needs --remote: the git repository to push to (a URL or a path)")
    atlas_dir = site.parent
    # GitHub Pages would run Jekyll over the site without this file, which hides nothing of
    # ours today but costs minutes per deploy at half a million files.
    extra = {".nojekyll": b""} if host.name == "github-pages" else {}
    if host.name == "huggingface" and not (site / "README.md").exists():
        # A Space is configured by its README's front matter: a static Space serves index.html.
        extra["README.md"] = b"---\ntitle: Neuron atlas\nsdk: static\napp_file: index.html\n---\n"
    result = push_site(site, atlas_dir / PUBLISH_DIR / f"{host.name}.git", remote, branch or host.branch,
                       "atlas publish", extra, progress)
    return {"host": host.name, "remote": remote, "branch": branch or host.branch, "stats": stats, **result}


class SiteTooBig(AtlasError):
    def __init__(self, host: Host, broken: list[str]):
        shown = broken[:20] + ([f"... and {len(broken) - 20} more"] if len(broken) > 20 else [])
        super().__init__(f"the site breaks {len(broken)} limit(s) of {host.name} ({host.note}); nothing was "
                         "uploaded:\n  " + "\n  ".join(shown))
        self.broken = broken
