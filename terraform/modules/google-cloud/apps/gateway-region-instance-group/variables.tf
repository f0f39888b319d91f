# Inputs keep the names of Firezone's GCP gateway module (docs/protocol.md §6.2), so a configuration written for it
# needs only the wheel's location and checksum (artifact_url, artifact_sha256) to switch to this gateway.

variable "project_id" {
  type        = string
  description = "ID of the Google Cloud project to deploy into."
}

variable "compute_network" {
  type        = string
  description = "Self link or name of the VPC network the gateways attach to."
}

variable "compute_subnetwork" {
  type        = string
  description = "Self link or name of the subnetwork the gateways attach to (dual stack: the NIC is IPV4_IPV6)."
}

variable "compute_region" {
  type        = string
  description = "Region of the regional managed instance group."
}

variable "compute_instance_availability_zones" {
  type        = list(string)
  default     = []
  description = "Zones to spread the gateways over; empty means every zone of the region."
}

variable "compute_instance_replicas" {
  type        = number
  description = "Number of gateways (the instance group's fixed target size; there is no autoscaler)."

  validation {
    condition     = var.compute_instance_replicas >= 1
    error_message = "compute_instance_replicas must be at least 1."
  }
}

variable "compute_instance_type" {
  type        = string
  description = "Machine type, e.g. n2-standard-2 (2 vCPUs carry about 1 000 clients)."
}

variable "compute_instance_architecture" {
  type        = string
  default     = "amd64"
  description = "CPU architecture of the image: amd64 or arm64 (the wheel is pure Python, so both work)."

  validation {
    condition     = contains(["amd64", "arm64"], var.compute_instance_architecture)
    error_message = "compute_instance_architecture must be amd64 or arm64."
  }
}

variable "compute_provision_public_ipv4_address" {
  type        = bool
  default     = true
  description = "Give each gateway an ephemeral public IPv4 address (false: egress through Cloud NAT)."
}

variable "compute_provision_public_ipv6_address" {
  type        = bool
  default     = true
  description = "Give each gateway an ephemeral public IPv6 address (needs a subnetwork with EXTERNAL IPv6 access)."
}

variable "swap_size_gb" {
  type        = number
  default     = 0
  description = "Size of a swap file in GiB; 0 means none."

  validation {
    condition     = var.swap_size_gb >= 0 && floor(var.swap_size_gb) == var.swap_size_gb
    error_message = "swap_size_gb must be a whole number of GiB, 0 or more."
  }
}

variable "queue_count" {
  type        = number
  default     = 2
  description = "gVNIC receive/transmit queue count: an even number from 2 to 16."

  validation {
    condition     = var.queue_count >= 2 && var.queue_count <= 16 && var.queue_count % 2 == 0
    error_message = "queue_count must be an even number from 2 to 16."
  }
}

variable "observability_log_level" {
  type        = string
  default     = "info"
  description = "Log level or directives (RUST_LOG syntax, e.g. info or warn,agent.portal=debug)."
}

variable "observability_log_format" {
  type        = string
  default     = "human"
  description = "Log format: human or json."

  validation {
    condition     = contains(["human", "json"], var.observability_log_format)
    error_message = "observability_log_format must be human or json."
  }
}

variable "observability_enable_flow_logs" {
  type        = bool
  default     = false
  description = "Track and log flows even if the portal disabled flow-log uploads (FIREZONE_FLOW_LOGS)."
}

variable "name" {
  type        = string
  nullable    = false
  default     = "gateway"
  description = "Prefix of every resource name; the network tag is firezone-gateways-<name>, the service account firezone-<name>."

  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]{0,19}[a-z0-9])?$", var.name))
    error_message = "name must be a lowercase RFC 1035 label of at most 21 characters (service account ids have 30)."
  }
}

variable "labels" {
  type        = map(string)
  default     = {}
  description = "Labels for every resource that takes them, merged with managed_by, application and version."
}

variable "max_unavailable_fixed" {
  type        = number
  default     = null
  description = "Rolling update: instances that may be unavailable at once; default max(1, number of zones)."
}

variable "max_surge_fixed" {
  type        = number
  default     = null
  description = "Rolling update: extra instances during an update; default max(1, replicas - 1) + number of zones."

  validation {
    condition     = var.max_surge_fixed == null ? true : var.max_surge_fixed >= 1
    error_message = "max_surge_fixed must be at least 1 when set."
  }
}

variable "token" {
  type        = string
  sensitive   = true
  description = "Gateway token from the Firezone portal (site > deploy gateway). Stored on each VM as a credential."
}

variable "api_url" {
  type        = string
  default     = "wss://api.firezone.dev"
  description = "Portal URL."
}

variable "artifact_url" {
  type        = string
  description = "Base URL (https) of the wheels: the VM fetches <artifact_url>/firezone_gateway_py-<vsn>-py3-none-any.whl."

  validation {
    condition     = startswith(var.artifact_url, "https://")
    error_message = "artifact_url must be an https URL."
  }
}

variable "artifact_sha256" {
  type        = string
  description = "sha256 of that wheel; the VM refuses to install anything else. Not in Firezone's module: it pins the version in its install script instead."

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.artifact_sha256))
    error_message = "artifact_sha256 must be 64 lowercase hex characters."
  }
}

variable "vsn" {
  type        = string
  default     = "1.6.0"
  description = "Gateway version (the wheel's version): names the wheel, the instance group version and the version label. A checksum pins one file, so there is no \"latest\"."

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+([.+-][0-9A-Za-z.]+)?$", var.vsn))
    error_message = "vsn must be a version such as 1.6.0."
  }
}

variable "additional_startup_commands" {
  type        = list(string)
  default     = []
  description = "Shell commands run (as root, by cloud-init) after the gateway is installed."

  validation {
    condition     = alltrue([for command in var.additional_startup_commands : trimspace(command) != ""])
    error_message = "additional_startup_commands must not contain empty commands."
  }
}

variable "health_check" {
  type = object({
    name     = optional(string, "health")
    protocol = optional(string, "TCP")
    port     = optional(number, 8080)

    initial_delay_sec   = optional(number, 100)
    check_interval_sec  = optional(number, 15)
    timeout_sec         = optional(number, 10)
    healthy_threshold   = optional(number, 1)
    unhealthy_threshold = optional(number, 3)

    http_health_check = optional(object({
      request_path = optional(string, "/healthz")
    }), {})
  })
  default     = {}
  description = "Auto-healing: an HTTP check of the gateway's health server (GET /healthz, 200 while it runs). protocol and port also shape the firewall rule for Google's checkers."
}
